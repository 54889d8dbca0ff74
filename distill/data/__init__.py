"""Data every stage reads: prompt sources, trace records and the trace dataset reader, rendering
to token ids and loss masks, and packing."""
