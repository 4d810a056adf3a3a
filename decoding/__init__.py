"""The alignment methods and the pipeline that composes them."""
