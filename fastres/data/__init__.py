"""CIFAR-10 sources, caching, splits and loaders."""
