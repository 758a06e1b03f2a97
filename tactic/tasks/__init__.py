"""Task networks: classifiers (classifiers.py), segmenters (segmenters.py), cResNet-39 and its latent
head for the compressed-domain modes (cresnet.py). None downloads weights: they come from a path."""
