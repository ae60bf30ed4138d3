"""The Python binding loading into a PyTorch CUDA tensor, as an engine would:
a real gateway process (DUALPATH_BIN) serving synthetic blocks, the KV tensor
layer-major on the GPU, every layer copied back and compared when it is
reported. Run by `scripts/gpu-check.sh run` on a GPU machine, with the binding
built here (PYTHONPATH set by the script). Without torch or a CUDA device it
says SKIPPED and exits 2, which gpu-check counts as a failure to look at.
"""

import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "client-py" / "tests"))

from harness import BLOCKS, LAYER_BYTES, LAYERS, Gateway, synthetic_block  # noqa: E402


def main():
    try:
        import torch
    except ImportError:
        print("SKIPPED: no torch on this machine")
        return 2
    if not torch.cuda.is_available():
        print("SKIPPED: torch sees no CUDA device")
        return 2
    import dualpath

    with tempfile.TemporaryDirectory() as directory:
        gateway = Gateway(pathlib.Path(directory))
        try:
            client = dualpath.Client([gateway.address])
            stride = BLOCKS * LAYER_BYTES
            kv = torch.zeros(LAYERS * stride, dtype=torch.uint8, device="cuda")
            offsets = [index * LAYER_BYTES for index in range(BLOCKS)]
            load = client.load_to_device(
                "kv", kv.data_ptr(), kv.nbytes, gateway.keys, offsets, device=0, layer_stride=stride
            )
            for layer in range(LAYERS):
                load.wait_layer(layer, timeout=60)
                on_device = kv[layer * stride:(layer + 1) * stride].cpu().numpy().tobytes()
                for index, key in enumerate(gateway.keys):
                    expected = synthetic_block(key)[layer * LAYER_BYTES:(layer + 1) * LAYER_BYTES]
                    if on_device[index * LAYER_BYTES:(index + 1) * LAYER_BYTES] != expected:
                        print(f"FAILED: block {index} layer {layer} differs on the device")
                        return 1
            states = load.wait(timeout=60)
            if not all(state == "done" for state, _, _ in states):
                print(f"FAILED: {[s for s in states if s[0] != 'done'][:3]}")
                return 1
            print(f"python device load: {BLOCKS} blocks x {LAYERS} layers checked on the GPU; direct = {load.direct}")
            # Let go of the tensor's memory; a second time there is nothing to let go of.
            client.unregister_device(kv.data_ptr(), kv.nbytes)
            try:
                client.unregister_device(kv.data_ptr(), kv.nbytes)
                print("FAILED: device memory let go of twice")
                return 1
            except ValueError:
                pass
            print("python unregister_device: the tensor's memory let go of")
            # A load running when the client closes ends with the close: its
            # copies have finished and nothing more reaches the tensor.
            load = client.load_to_device(
                "kv", kv.data_ptr(), kv.nbytes, gateway.keys, offsets, device=0, layer_stride=stride
            )
            load.wait_layer(0, timeout=60)
            client.close()
            before = kv.cpu().numpy().tobytes()
            time.sleep(0.3)
            if kv.cpu().numpy().tobytes() != before:
                print("FAILED: the tensor changed after close returned")
                return 1
            try:
                client.load_to_device("kv", kv.data_ptr(), kv.nbytes, gateway.keys, offsets, device=0, layer_stride=stride)
                print("FAILED: a closed client took a load")
                return 1
            except dualpath.ClientClosedError:
                pass
            print("python close: a device load cancelled, the tensor untouched afterwards")
            return 0
        finally:
            gateway.stop()


if __name__ == "__main__":
    sys.exit(main())
