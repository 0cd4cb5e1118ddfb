"""The model card: the facts of a finished job and the README text written from them."""
