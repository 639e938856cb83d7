"""Example C-SWAP plugins: see README.md in the package folder."""
