"""Image operations shared by the dataset builder and the trainer: the CoDE augmentations."""
