"""CIFAR-10 and CIFAR-100 sources, caching, splits and loaders."""
