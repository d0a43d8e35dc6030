"""Console scripts: parse flags, call the library."""
