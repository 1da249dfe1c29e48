"""What is built on the library: the ``sj-parallel`` command line (:mod:`.cli`), the demo
(:mod:`.demo`), comparison tables and plots against SpikingJelly's converters (:mod:`.compare`),
training (:mod:`.training`), the model zoo and model loading (:mod:`.models`), datasets
(:mod:`.data`) and the shipped checkpoints and CIFAR-10 subset (``checkpoints/``, ``data_files/``).

The library (``sj_parallel_conversion`` itself) imports none of these, so importing it does not
pay for torchvision, matplotlib or the command line.
"""
