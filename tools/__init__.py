"""What mnist_net.py (the chapter) needs that is not about the network, one module per job.
Each imports the chapter; the chapter never imports them at module level.

- command_line.py: the full command line: the chapter's flags and the rest (fetching, model files,
  your own pictures, reports, looking inside, the progress line); mnist_net.main() hands over to it.
- model_files.py: --save-model and --load-model: a network as an .npz under PyTorch's names, with
  its spec, data set and input scaling; files of the previous version too.
- fetch_data.py: fetching MNIST or Fashion-MNIST and verifying it byte for byte, never half a file.
- reports.py: confusions, mistakes and filters in the terminal, the history CSV, the plot.
- maps_and_saliency.py: --show-maps and --why, one image's maps after every layer and its saliency.
- trace.py: --trace, one test image forward and backward with numbers to check by hand.
- diagnose.py: --diagnose, a few hundred steps of the run's recipe and what is wrong with them.
- gradcheck.py: the gradient checks for --gradcheck.
- own_digits.py: your own digits (or clothes) for --predict: reading PGM/.npy/PNG/JPEG, preparing
  them like MNIST (or Fashion-MNIST).
- to_pytorch.py: a saved model loaded into the same network built in PyTorch:
  python3 -m tools.to_pytorch MODEL.npz.
- benchmark.py: mnist_net.py against the PyTorch peer: python3 -m tools.benchmark.
- as_platform.py: mnist_net.py as another machine runs it (Windows, macOS, ARM, ...), that machine's
  missing pieces taken away: python3 -m tools.as_platform PLAY [flags].

See docs/ for what each does, with sample output.
"""
