"""Images: decoding files into pixels, query inputs, and the edits that make test copies."""
