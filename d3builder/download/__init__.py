"""Downloading real images: the img2dataset runner."""
