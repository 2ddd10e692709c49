"""Images in: dataset intake, WD14 tagging and the training dataset (buckets, captions)."""
