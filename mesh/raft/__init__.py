"""mesh.raft"""
