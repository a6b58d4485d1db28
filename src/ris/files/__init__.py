"""Files: finding the images under the given folders, and writing files and locks safely."""
