"""Interoperability with other implementations of Engram.

    deepseek   key-name and layout mappings of DeepSeek's demo and V4.1 state dicts (pure functions)
    bundle     the Engram bundle: the one on-disk format for Engram layer sets (imports, the HF adapter)
    convert    import DeepSeek's weights into bundles and export bundles in V4.1's layout, streaming tables
    stfile     safetensors headers and row-range reads / chunked writes (tables larger than memory)
    commands   ``engram import`` / ``engram export`` (argument parsing only)
"""
