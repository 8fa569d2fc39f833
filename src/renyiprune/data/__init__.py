"""Images and the evaluation transform (images), named data sets (datasets), training augmentation."""
