"""fastres: He et al. 2016 CIFAR-10 ResNets, reproduced exactly and fast."""
