"""The model: the transformer, its mixture of experts, kernels, parameter roles, shapes,
parameter and FLOP accounting, layer statistics, rematerialisation and the memory estimate."""
