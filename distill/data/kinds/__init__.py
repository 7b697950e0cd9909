"""One file per dataset kind, each registering its `data:` keys, depth range, evaluation crop and builder.

Kept free of torch and rosbags (the builders import their readers when called), so validating a config stays fast.
"""
