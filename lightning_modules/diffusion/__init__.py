"""Diffusion family (issue 11, being built): the continuous-time noise schedule (`schedule`) and the variational
bound on -log p(x) (`bound`), tested against closed forms on Gaussian data. The model itself, and its place in the
registry and the pipeline, come with the rest of the issue."""
