"""The embedded default data: a generated "toy world" (no download).

Words belong to latent topics; sentences come from a few grammatical templates that share
function words (so MLM has syntax to learn: agreement, word order); documents are runs of
sentences mostly on one topic (so NSP is learnable: a random B usually changes topic); the
labeled task is the topic of one sentence. 8 topics x (40 nouns, 16 verbs, 16 adjectives),
~140 word forms per topic: a handful of labeled sentences per topic sees only a fraction of
them, so a sentence of unseen words can only be classified by a model that learned from the
unlabeled text which words keep company -- the point of pre-training (C1). docs/toy-world.md
has the numbers.

Run `python toyworld.py` to see a document and a few labeled sentences.
"""

import re

import numpy as np

# TOPICS (at the end of this file): topic -> {"nouns": [(singular, plural)],
#     "verbs": [(base, third, past)], "adjectives": [...]}

# {sg}/{pl}: a noun, singular/plural; {base}/{third}/{past}: a verb; {adj}: an adjective.
TEMPLATES = [
    "the {adj} {sg} {third} the {sg} .",
    "yesterday we {past} the {pl} with a {adj} {sg} .",
    "many {pl} are {adj} because the {sg} {third} them .",
    "they will {base} the {adj} {pl} near the {sg} .",
]


def toy_sentence(rng, topic, word_noise):
    """One sentence on `topic`; each content word is from another topic with prob word_noise."""
    names = list(TOPICS)

    def words_of(kind):
        source = topic if rng.random() >= word_noise else names[rng.integers(len(names))]
        entries = TOPICS[source][kind]
        return entries[rng.integers(len(entries))]

    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    fills = {"sg": lambda: words_of("nouns")[0], "pl": lambda: words_of("nouns")[1],
             "base": lambda: words_of("verbs")[0], "third": lambda: words_of("verbs")[1],
             "past": lambda: words_of("verbs")[2], "adj": lambda: words_of("adjectives")}
    return re.sub(r"\{(\w+)\}", lambda slot: fills[slot.group(1)](), template)


def toy_word_topics():
    """Every content word form of the toy world -> its topic."""
    return {form: topic for topic, words in TOPICS.items()
            for kind in ("nouns", "verbs", "adjectives") for entry in words[kind]
            for form in ((entry,) if isinstance(entry, str) else entry)}


def toy_world(seed=0, num_documents=20000, labeled_per_class=(64, 32, 100), sentence_noise=0.1,
              word_noise=0.05):
    """Generate the embedded default deterministically from `seed` (a few seconds).

    Returns {"unlabeled": documents, "train": [(sentence, topic)], "valid": ..., "test": ...}.
    The four parts are disjoint: a labeled sentence never appears in the unlabeled corpus nor
    in another labeled split."""
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    documents, seen = [], set()
    for _ in range(num_documents):
        topic = names[rng.integers(len(names))]
        document = []
        for _ in range(rng.integers(3, 9)):
            # a document is mostly on its topic; some sentences wander off (noise)
            noisy = rng.random() < sentence_noise
            sentence_topic = names[rng.integers(len(names))] if noisy else topic
            document.append(toy_sentence(rng, sentence_topic, word_noise))
        documents.append(document)
        seen.update(document)
    splits = {"unlabeled": documents}
    for split, per_class in zip(("train", "valid", "test"), labeled_per_class):
        examples = []
        for topic in names:
            found = 0
            while found < per_class:
                sentence = toy_sentence(rng, topic, 0.0)  # labeled sentences are clean
                if sentence not in seen:
                    seen.add(sentence)
                    examples.append((sentence, topic))
                    found += 1
        order = rng.permutation(len(examples))
        splits[split] = [examples[i] for i in order]
    return splits


# ----------------------------------------------------------------------------------------
# The toy world's words: 8 topics, each 40 nouns, 16 verbs, 16 adjectives; no word form is in
# two topics.
# ----------------------------------------------------------------------------------------

TOPICS = {
    "kitchen": {
        "nouns": [
            ("knife", "knives"), ("pot", "pots"), ("pan", "pans"), ("spoon", "spoons"),
            ("fork", "forks"),
            ("plate", "plates"), ("bowl", "bowls"), ("cup", "cups"), ("oven", "ovens"),
            ("stove", "stoves"),
            ("kettle", "kettles"), ("sink", "sinks"), ("fridge", "fridges"), ("ladle", "ladles"),
            ("whisk", "whisks"),
            ("apron", "aprons"), ("jar", "jars"), ("lid", "lids"), ("napkin", "napkins"),
            ("teapot", "teapots"),
            ("mug", "mugs"), ("tray", "trays"), ("toaster", "toasters"), ("blender", "blenders"),
            ("grater", "graters"), ("sieve", "sieves"), ("peeler", "peelers"),
            ("skillet", "skillets"),
            ("saucer", "saucers"), ("colander", "colanders"), ("cupboard", "cupboards"),
            ("drawer", "drawers"),
            ("spatula", "spatulas"), ("recipe", "recipes"), ("sandwich", "sandwiches"),
            ("pancake", "pancakes"),
            ("onion", "onions"), ("cookie", "cookies"), ("muffin", "muffins"),
            ("dumpling", "dumplings"),
        ],
        "verbs": [
            ("stir", "stirs", "stirred"), ("chop", "chops", "chopped"), ("bake", "bakes", "baked"),
            ("boil", "boils", "boiled"), ("fry", "fries", "fried"), ("slice", "slices", "sliced"),
            ("peel", "peels", "peeled"), ("roast", "roasts", "roasted"),
            ("rinse", "rinses", "rinsed"),
            ("mash", "mashes", "mashed"), ("dice", "dices", "diced"),
            ("grill", "grills", "grilled"),
            ("simmer", "simmers", "simmered"), ("toast", "toasts", "toasted"),
            ("knead", "kneads", "kneaded"),
            ("scramble", "scrambles", "scrambled"),
        ],
        "adjectives": [
            "salty", "crispy", "spicy", "sweet", "sour", "greasy", "juicy", "tasty", "delicious",
            "creamy", "crunchy",
            "bitter", "savory", "buttery", "fluffy", "soggy",
        ],
    },
    "sea": {
        "nouns": [
            ("wave", "waves"), ("ship", "ships"), ("boat", "boats"), ("shell", "shells"),
            ("crab", "crabs"),
            ("whale", "whales"), ("dolphin", "dolphins"), ("shark", "sharks"),
            ("octopus", "octopuses"),
            ("seagull", "seagulls"), ("anchor", "anchors"), ("sail", "sails"),
            ("harbor", "harbors"),
            ("island", "islands"), ("beach", "beaches"), ("reef", "reefs"), ("tide", "tides"),
            ("lighthouse", "lighthouses"), ("sailor", "sailors"), ("pirate", "pirates"),
            ("oyster", "oysters"),
            ("lobster", "lobsters"), ("seal", "seals"), ("buoy", "buoys"), ("dock", "docks"),
            ("pier", "piers"),
            ("yacht", "yachts"), ("canoe", "canoes"), ("mast", "masts"), ("oar", "oars"),
            ("penguin", "penguins"),
            ("turtle", "turtles"), ("clam", "clams"), ("shore", "shores"), ("bay", "bays"),
            ("cove", "coves"),
            ("submarine", "submarines"), ("raft", "rafts"), ("ferry", "ferries"),
            ("walrus", "walruses"),
        ],
        "verbs": [
            ("steer", "steers", "steered"), ("row", "rows", "rowed"), ("moor", "moors", "moored"),
            ("navigate", "navigates", "navigated"), ("capsize", "capsizes", "capsized"),
            ("hoist", "hoists", "hoisted"), ("paddle", "paddles", "paddled"),
            ("tow", "tows", "towed"),
            ("board", "boards", "boarded"), ("rescue", "rescues", "rescued"),
            ("harpoon", "harpoons", "harpooned"),
            ("salvage", "salvages", "salvaged"), ("wreck", "wrecks", "wrecked"),
            ("charter", "charters", "chartered"),
            ("float", "floats", "floated"), ("spear", "spears", "speared"),
        ],
        "adjectives": [
            "sandy", "stormy", "choppy", "briny", "foamy", "coastal", "tidal", "marine", "nautical",
            "breezy",
            "seasick", "turquoise", "misty", "oceanic", "underwater", "windy",
        ],
    },
    "music": {
        "nouns": [
            ("song", "songs"), ("guitar", "guitars"), ("piano", "pianos"), ("drum", "drums"),
            ("violin", "violins"),
            ("flute", "flutes"), ("trumpet", "trumpets"), ("singer", "singers"), ("band", "bands"),
            ("concert", "concerts"), ("melody", "melodies"), ("chord", "chords"),
            ("lyric", "lyrics"),
            ("album", "albums"), ("microphone", "microphones"), ("choir", "choirs"),
            ("orchestra", "orchestras"),
            ("tune", "tunes"), ("rhythm", "rhythms"), ("harp", "harps"), ("cello", "cellos"),
            ("saxophone", "saxophones"), ("clarinet", "clarinets"), ("trombone", "trombones"),
            ("banjo", "banjos"),
            ("ukulele", "ukuleles"), ("tuba", "tubas"), ("drummer", "drummers"),
            ("guitarist", "guitarists"),
            ("pianist", "pianists"), ("composer", "composers"), ("conductor", "conductors"),
            ("symphony", "symphonies"), ("ballad", "ballads"), ("chorus", "choruses"),
            ("verse", "verses"),
            ("opera", "operas"), ("harmonica", "harmonicas"), ("keyboard", "keyboards"),
            ("metronome", "metronomes"),
        ],
        "verbs": [
            ("play", "plays", "played"), ("sing", "sings", "sang"), ("strum", "strums", "strummed"),
            ("hum", "hums", "hummed"), ("compose", "composes", "composed"),
            ("record", "records", "recorded"),
            ("perform", "performs", "performed"), ("rehearse", "rehearses", "rehearsed"),
            ("whistle", "whistles", "whistled"), ("conduct", "conducts", "conducted"),
            ("pluck", "plucks", "plucked"),
            ("amplify", "amplifies", "amplified"), ("remix", "remixes", "remixed"),
            ("harmonize", "harmonizes", "harmonized"), ("transpose", "transposes", "transposed"),
            ("applaud", "applauds", "applauded"),
        ],
        "adjectives": [
            "melodic", "musical", "loud", "harmonious", "rhythmic", "catchy", "acoustic",
            "classical", "jazzy",
            "upbeat", "soulful", "tuneful", "lyrical", "orchestral", "operatic", "choral",
        ],
    },
    "law": {
        "nouns": [
            ("judge", "judges"), ("lawyer", "lawyers"), ("court", "courts"), ("jury", "juries"),
            ("witness", "witnesses"), ("trial", "trials"), ("verdict", "verdicts"),
            ("crime", "crimes"),
            ("criminal", "criminals"), ("prisoner", "prisoners"), ("prison", "prisons"),
            ("officer", "officers"),
            ("detective", "detectives"), ("thief", "thieves"), ("contract", "contracts"),
            ("lawsuit", "lawsuits"),
            ("courtroom", "courtrooms"), ("sentence", "sentences"), ("suspect", "suspects"),
            ("defendant", "defendants"), ("prosecutor", "prosecutors"), ("attorney", "attorneys"),
            ("law", "laws"),
            ("statute", "statutes"), ("warrant", "warrants"), ("alibi", "alibis"),
            ("clue", "clues"),
            ("handcuff", "handcuffs"), ("jail", "jails"), ("gavel", "gavels"),
            ("appeal", "appeals"),
            ("testimony", "testimonies"), ("confession", "confessions"), ("burglar", "burglars"),
            ("robbery", "robberies"), ("fingerprint", "fingerprints"),
            ("courthouse", "courthouses"),
            ("penalty", "penalties"), ("subpoena", "subpoenas"), ("inmate", "inmates"),
        ],
        "verbs": [
            ("arrest", "arrests", "arrested"), ("sue", "sues", "sued"),
            ("convict", "convicts", "convicted"),
            ("acquit", "acquits", "acquitted"), ("prosecute", "prosecutes", "prosecuted"),
            ("accuse", "accuses", "accused"), ("interrogate", "interrogates", "interrogated"),
            ("investigate", "investigates", "investigated"), ("enforce", "enforces", "enforced"),
            ("pardon", "pardons", "pardoned"), ("indict", "indicts", "indicted"),
            ("overrule", "overrules", "overruled"), ("imprison", "imprisons", "imprisoned"),
            ("detain", "detains", "detained"), ("summon", "summons", "summoned"),
            ("overturn", "overturns", "overturned"),
        ],
        "adjectives": [
            "legal", "illegal", "guilty", "innocent", "lawful", "unlawful", "judicial", "unfair",
            "corrupt", "sworn",
            "binding", "liable", "forensic", "constitutional", "lenient", "legitimate",
        ],
    },
    "farm": {
        "nouns": [
            ("cow", "cows"), ("pig", "pigs"), ("horse", "horses"), ("goat", "goats"),
            ("chicken", "chickens"),
            ("hen", "hens"), ("rooster", "roosters"), ("duck", "ducks"), ("goose", "geese"),
            ("barn", "barns"),
            ("tractor", "tractors"), ("field", "fields"), ("fence", "fences"),
            ("farmer", "farmers"),
            ("crop", "crops"), ("seed", "seeds"), ("plow", "plows"), ("haystack", "haystacks"),
            ("scarecrow", "scarecrows"), ("pitchfork", "pitchforks"), ("bucket", "buckets"),
            ("stable", "stables"),
            ("pasture", "pastures"), ("orchard", "orchards"), ("pumpkin", "pumpkins"),
            ("carrot", "carrots"),
            ("potato", "potatoes"), ("tomato", "tomatoes"), ("turnip", "turnips"),
            ("calf", "calves"),
            ("lamb", "lambs"), ("piglet", "piglets"), ("pony", "ponies"), ("donkey", "donkeys"),
            ("mule", "mules"),
            ("silo", "silos"), ("trough", "troughs"), ("wagon", "wagons"), ("beehive", "beehives"),
            ("windmill", "windmills"),
        ],
        "verbs": [
            ("feed", "feeds", "fed"), ("milk", "milks", "milked"),
            ("harvest", "harvests", "harvested"),
            ("plant", "plants", "planted"), ("water", "waters", "watered"),
            ("herd", "herds", "herded"),
            ("shear", "shears", "sheared"), ("saddle", "saddles", "saddled"),
            ("sow", "sows", "sowed"),
            ("reap", "reaps", "reaped"), ("fertilize", "fertilizes", "fertilized"),
            ("irrigate", "irrigates", "irrigated"), ("bale", "bales", "baled"),
            ("breed", "breeds", "bred"),
            ("weed", "weeds", "weeded"), ("hatch", "hatches", "hatched"),
        ],
        "adjectives": [
            "muddy", "rural", "rustic", "fertile", "ripe", "organic", "grassy", "dusty", "leafy",
            "woolly", "plump",
            "fresh", "golden", "dairy", "pastoral", "agricultural",
        ],
    },
    "space": {
        "nouns": [
            ("planet", "planets"), ("star", "stars"), ("moon", "moons"), ("rocket", "rockets"),
            ("astronaut", "astronauts"), ("comet", "comets"), ("galaxy", "galaxies"),
            ("asteroid", "asteroids"),
            ("satellite", "satellites"), ("telescope", "telescopes"), ("orbit", "orbits"),
            ("spaceship", "spaceships"), ("meteor", "meteors"), ("meteorite", "meteorites"),
            ("alien", "aliens"),
            ("nebula", "nebulae"), ("crater", "craters"), ("cosmonaut", "cosmonauts"),
            ("shuttle", "shuttles"),
            ("spacesuit", "spacesuits"), ("helmet", "helmets"), ("launchpad", "launchpads"),
            ("observatory", "observatories"), ("constellation", "constellations"),
            ("quasar", "quasars"),
            ("pulsar", "pulsars"), ("supernova", "supernovae"), ("rover", "rovers"),
            ("module", "modules"),
            ("antenna", "antennas"), ("lander", "landers"), ("thruster", "thrusters"),
            ("starship", "starships"),
            ("sun", "suns"), ("universe", "universes"), ("eclipse", "eclipses"),
            ("orbiter", "orbiters"),
            ("wormhole", "wormholes"), ("spacewalk", "spacewalks"), ("booster", "boosters"),
        ],
        "verbs": [
            ("launch", "launches", "launched"), ("explore", "explores", "explored"),
            ("land", "lands", "landed"),
            ("pilot", "pilots", "piloted"), ("detect", "detects", "detected"),
            ("observe", "observes", "observed"),
            ("deploy", "deploys", "deployed"), ("propel", "propels", "propelled"),
            ("refuel", "refuels", "refueled"),
            ("eject", "ejects", "ejected"), ("transmit", "transmits", "transmitted"),
            ("colonize", "colonizes", "colonized"), ("terraform", "terraforms", "terraformed"),
            ("photograph", "photographs", "photographed"), ("magnify", "magnifies", "magnified"),
            ("jettison", "jettisons", "jettisoned"),
        ],
        "adjectives": [
            "cosmic", "lunar", "solar", "stellar", "orbital", "galactic", "interstellar",
            "celestial", "weightless",
            "gravitational", "planetary", "starry", "extraterrestrial", "astronomical", "airless",
            "interplanetary",
        ],
    },
    "medicine": {
        "nouns": [
            ("doctor", "doctors"), ("nurse", "nurses"), ("patient", "patients"),
            ("hospital", "hospitals"),
            ("pill", "pills"), ("capsule", "capsules"), ("syringe", "syringes"),
            ("needle", "needles"),
            ("bandage", "bandages"), ("clinic", "clinics"), ("surgeon", "surgeons"),
            ("vaccine", "vaccines"),
            ("injection", "injections"), ("prescription", "prescriptions"), ("fever", "fevers"),
            ("wound", "wounds"),
            ("ambulance", "ambulances"), ("stethoscope", "stethoscopes"),
            ("thermometer", "thermometers"),
            ("disease", "diseases"), ("infection", "infections"), ("symptom", "symptoms"),
            ("virus", "viruses"),
            ("germ", "germs"), ("tumor", "tumors"), ("fracture", "fractures"),
            ("scalpel", "scalpels"),
            ("pharmacy", "pharmacies"), ("pharmacist", "pharmacists"), ("dentist", "dentists"),
            ("ointment", "ointments"), ("stretcher", "stretchers"), ("wheelchair", "wheelchairs"),
            ("crutch", "crutches"), ("vitamin", "vitamins"), ("antibiotic", "antibiotics"),
            ("rash", "rashes"),
            ("headache", "headaches"), ("allergy", "allergies"), ("diagnosis", "diagnoses"),
        ],
        "verbs": [
            ("treat", "treats", "treated"), ("cure", "cures", "cured"), ("heal", "heals", "healed"),
            ("examine", "examines", "examined"), ("prescribe", "prescribes", "prescribed"),
            ("vaccinate", "vaccinates", "vaccinated"), ("inject", "injects", "injected"),
            ("sterilize", "sterilizes", "sterilized"), ("disinfect", "disinfects", "disinfected"),
            ("stitch", "stitches", "stitched"), ("immunize", "immunizes", "immunized"),
            ("infect", "infects", "infected"), ("sedate", "sedates", "sedated"),
            ("hospitalize", "hospitalizes", "hospitalized"), ("medicate", "medicates", "medicated"),
            ("swab", "swabs", "swabbed"),
        ],
        "adjectives": [
            "sick", "healthy", "feverish", "contagious", "infectious", "medical", "clinical",
            "surgical", "chronic",
            "sterile", "painful", "swollen", "dizzy", "nauseous", "itchy", "allergic",
        ],
    },
    "sport": {
        "nouns": [
            ("ball", "balls"), ("bat", "bats"), ("goal", "goals"), ("team", "teams"),
            ("player", "players"),
            ("coach", "coaches"), ("referee", "referees"), ("stadium", "stadiums"),
            ("trophy", "trophies"),
            ("medal", "medals"), ("racket", "rackets"), ("glove", "gloves"), ("net", "nets"),
            ("captain", "captains"),
            ("goalkeeper", "goalkeepers"), ("athlete", "athletes"), ("champion", "champions"),
            ("tournament", "tournaments"), ("match", "matches"), ("race", "races"),
            ("runner", "runners"),
            ("sprinter", "sprinters"), ("jersey", "jerseys"), ("sneaker", "sneakers"),
            ("skateboard", "skateboards"),
            ("marathon", "marathons"), ("league", "leagues"), ("fan", "fans"),
            ("scoreboard", "scoreboards"),
            ("puck", "pucks"), ("hoop", "hoops"), ("mitt", "mitts"), ("hurdle", "hurdles"),
            ("javelin", "javelins"),
            ("dumbbell", "dumbbells"), ("gym", "gyms"), ("locker", "lockers"),
            ("umpire", "umpires"),
            ("opponent", "opponents"), ("teammate", "teammates"),
        ],
        "verbs": [
            ("kick", "kicks", "kicked"), ("throw", "throws", "threw"),
            ("catch", "catches", "caught"),
            ("score", "scores", "scored"), ("pass", "passes", "passed"),
            ("tackle", "tackles", "tackled"),
            ("dribble", "dribbles", "dribbled"), ("win", "wins", "won"),
            ("defend", "defends", "defended"),
            ("block", "blocks", "blocked"), ("serve", "serves", "served"),
            ("shoot", "shoots", "shot"),
            ("bounce", "bounces", "bounced"), ("swing", "swings", "swung"),
            ("pitch", "pitches", "pitched"),
            ("punt", "punts", "punted"),
        ],
        "adjectives": [
            "athletic", "competitive", "sporty", "undefeated", "victorious", "sweaty", "energetic",
            "muscular",
            "agile", "speedy", "defensive", "offensive", "unbeaten", "professional", "fit",
            "nimble",
        ],
    },
}


if __name__ == "__main__":
    world = toy_world(seed=0, num_documents=200)
    print(f"toy world: {len(world['unlabeled'])} documents (a sample), topics: {', '.join(TOPICS)}")
    print("a document:\n  " + "\n  ".join(world["unlabeled"][0]))
    print("labeled examples:\n  " + "\n  ".join(f"{t}\t{y}" for t, y in world["train"][:4]))
    print(f"{len(toy_word_topics())} content word forms; train/valid/test: "
          + "/".join(str(len(world[s])) for s in ("train", "valid", "test")) + " labeled sentences")
