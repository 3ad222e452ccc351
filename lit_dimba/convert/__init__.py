"""Import weights of other projects as our ``Backbone`` (PixArt-alpha: ``lit_dimba.convert.pixart``)."""
