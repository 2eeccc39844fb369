"""DiPro at scale: the model, its data pipeline, distributed training and tracking."""
__version__ = "0.1.0"
