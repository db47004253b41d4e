"""grace.ep: GRACE's expert-parallel MoE layer from PyTorch, with a DeepEP-shaped API (see docs/python.md).

``grace.ep._torch_comm.TorchComm`` is the host communicator over torch.distributed (gloo) that the C++ layers call
through ``grace._grace._ep.HostCommunicator``.
"""
