"""HuBERT pretraining with iterative k-means targets under several schedules."""
