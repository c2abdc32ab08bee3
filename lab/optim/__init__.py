"""The optimizers: AdamW and Muon with their masks and μP scales, the learning-rate schedules,
QK-clip, and the gradient noise scale measured from the gradients."""
