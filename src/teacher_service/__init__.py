"""Teacher service: a model behind HTTP and gRPC that scores text and samples from itself."""
