"""Training on the torch backend: the loop (`loop.run_training`, called by `parrot.training.train`),
the model set-up, the sharding strategy, checkpoint state and the final export."""
