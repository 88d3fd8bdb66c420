"""The data plane: the model repository, loaded model versions, and the router over them."""
