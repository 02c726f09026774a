"""Asynchronous SGD through parameter servers (Downpour-style), over torch.distributed.rpc (TensorPipe)."""
