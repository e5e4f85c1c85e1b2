"""mesh.gossip"""
