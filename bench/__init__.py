"""kexecfs's benchmarks (``make bench`` = ``python -m bench``), one module per section.

``harness`` mounts the daemons (kexecfs itself and the floor, ``floorfs.py``), makes and
preserves memfds, interleaves each measurement with its baseline and prints tables and
goal lines; ``update`` is one live update by kexecfs and by the plain program. Each
section (``controlplane``, ``datapath``, ``memory``, ``blackout``, ``scale``) measures,
prints its tables and returns a ``harness.Section``: its data and its goals. ``run``
runs them in turn, writes bench/results/ and profiles (``profiles``) the goals missed
by far. See bench/README.md for what each figure means.
"""
