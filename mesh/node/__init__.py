"""mesh.node"""
