"""Search: ranking a query against the stored vectors, verifying the top results, what a result holds."""
