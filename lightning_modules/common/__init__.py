"""Mathematics shared by several families: the EM loop, Gaussian densities and k-means seeding, AIS,
the half-cube maps of binarised data, weight averaging (EMA), and network bodies sized from the data shape."""
