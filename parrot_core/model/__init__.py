"""The model spec, once for every backend: the config and its schema, the checkpoint layout and its
validation, the vision tower, image preprocessing, the prompt template and tokenizer, the splice."""
