"""Datasets: the input pipeline (TFDS data sources) and the Fashion-MNIST IDX builder."""
