"""TFDS datasets built and read without TensorFlow (array_record shards + `tfds.data_source`)."""
