"""Models: where one comes from (paths, aliases, GGUF), how it is loaded, its devices and dtypes, and
the teacher layers a student keeps."""
