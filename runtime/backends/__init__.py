"""Engine backends: named numpy arrays in, named numpy arrays out."""
