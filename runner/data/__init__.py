"""Images in: dataset intake, WD14 tagging, Florence-2 captioning and the training dataset (buckets, captions)."""
