"""What acps knows about each layer type: its geometry, where its channels sit in its parameters, and how it is
sliced, masked and re-fitted."""
