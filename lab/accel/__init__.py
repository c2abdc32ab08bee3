"""The devices: the backend's chips, the mesh and sharding rules, MFU, the compile cache and
profiling. Below the model and the optimizers, which lay their arrays out on the mesh."""
