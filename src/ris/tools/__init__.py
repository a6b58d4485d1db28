"""Tools: duplicates, evaluation, maps, export, benchmark and demo, built on a Collection."""
