"""Data: synthetic chest X-rays, real dataset loaders, report cleaning, collation."""
