"""What every other folder uses: argument checks, atomic files and locks, runtime settings, lazy names and aliases.

Nothing here imports another folder of condconv.
"""
