"""What mnist_net.py needs that is not about the network, one module per job:

- fetch_data.py: fetching MNIST or Fashion-MNIST and verifying it byte for byte, never half a file.
- reports.py: confusions, mistakes and filters in the terminal, the history CSV, the plot.
- maps_and_saliency.py: --show-maps and --why, one image's maps after every layer and its saliency.
- own_digits.py: your own digits (or clothes) for --predict: reading PGM/.npy/PNG/JPEG, preparing
  them like MNIST (or Fashion-MNIST).
- benchmark.py: mnist_net.py against the PyTorch peer: python3 -m tools.benchmark.
- gradcheck.py: the gradient checks for --gradcheck.
"""
