"""Data for training and evaluation: the authors' split files and folder pairs
(``datasets``), and synthetic exposure errors made from well-exposed photos
(``synthesis``)."""
