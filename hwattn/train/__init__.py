"""Training: `hwattn train` (`hwattn.train.trainer`)."""
