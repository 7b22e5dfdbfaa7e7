"""The synthetic shapes world: scenes and captions, the edit checker, the embedded model's
training and its benchmark (`diffedit eval shapes`)."""
