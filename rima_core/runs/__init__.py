"""The loops that run the network: the device and prediction engine, training, calibration,
alignment diagnostics, evaluation under every missing scenario (with equity tables and plots),
and Optuna tuning."""
